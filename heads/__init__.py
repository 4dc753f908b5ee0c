"""Task heads: classification, super-resolution, camouflaged object detection."""
