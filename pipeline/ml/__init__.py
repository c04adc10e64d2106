"""The ML toolkit: data sources and loaders, splits, the model zoo and adapters, body/head split, training."""
