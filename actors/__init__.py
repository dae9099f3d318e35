"""Everything that holds a network on a device: model zoo, layer catalog, extractor."""
