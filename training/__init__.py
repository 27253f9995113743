"""Data-parallel MNIST training with Ray Train, publishing versioned SavedModels."""
