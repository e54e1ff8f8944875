"""Using a finished model: loading it from any URI, predicting arrays and files, the model registry and its
promotion gates, the competition submission."""
