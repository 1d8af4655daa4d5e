"""treeprobe: does a vision model's representation agree with the tree of life?"""

__version__ = "0.1.0"
