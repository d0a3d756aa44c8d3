"""coreml-sd runtime: generate images from the Core ML packages that coreml-convert writes."""
