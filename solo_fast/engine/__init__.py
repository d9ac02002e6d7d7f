"""Training, evaluation and the checkpoints and processes they need."""
