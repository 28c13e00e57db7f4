"""Backbones: networks from input image to feature map, without heads; built by name through ``zoo.buildin_models``."""
