"""Training LSTM RNN-T models: config, data order, augmentation, the training loop, export."""
