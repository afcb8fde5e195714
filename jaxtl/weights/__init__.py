"""Pretrained weights: the registry, file fetching, a torch-free .pth reader and the torch -> Flax converters."""
