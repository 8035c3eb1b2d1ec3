"""TensorRT: lint a bundle's graphs for a TensorRT target, and build its engines on the target."""
