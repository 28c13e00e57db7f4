"""Tools over data and models: dataset preparation, sub-center cleaning, distillation data, export, pretrained import."""
