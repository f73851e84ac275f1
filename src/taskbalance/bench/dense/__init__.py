"""Dense prediction: per-pixel tasks (semantic segmentation, depth, surface normals).

:mod:`.metrics`: the standard metrics, accumulated over a split, and the per-pixel losses;
:mod:`.models`: SegNet and a dilated ResNet with DeepLab (ASPP) heads, hard parameter sharing;
:mod:`.scenes`: NYUv2 and Cityscapes from the preprocessed ``.npy`` copies the user holds;
:mod:`.digits`: a dense MultiMNIST whose scenes are built here (synthetic geometry).
"""
