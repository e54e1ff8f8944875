"""The small core every layer may use: errors, atomic outputs, redaction of secrets, the config schema
(typed settings), the entry-point wrapper, and the filter of TensorFlow start-up noise."""
