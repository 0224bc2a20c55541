"""grounded-sam-backend: a Label Studio ML backend turning label names and clicks into masks."""
