"""What a finished model scores: metrics and figures, intervals and paired tests, calibration, abstention,
comparison of runs, Grad-CAM, ensembles of runs."""
