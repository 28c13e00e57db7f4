"""Evaluation: verification on ``.bin`` files, IJB-B/C, folders of your own faces, metrics (numpy), embedding functions and plots."""
