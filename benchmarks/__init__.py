"""The benchmarks are scripts run from a checkout (python benchmarks/<name>.py); a package so that gpu.py starts its
worker as `python -m benchmarks.gpu_worker` and the tests import benchmarks.gpu and benchmarks.gpu_roofline."""
