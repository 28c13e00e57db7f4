"""Faces in photos: detection (MTCNN) and alignment to the ArcFace template."""
