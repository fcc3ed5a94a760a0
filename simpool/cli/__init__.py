"""Command-line tools beside training and evaluation (simpool-export, simpool-visualize): argv in, exit code out."""
