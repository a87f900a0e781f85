"""Data for the reference tasks: procedural offline sets and the real CIFAR-10 loader."""
