"""The e2e pod runner: starts layerlb's forwarding pods where no kubelet runs (see `runner.py`)."""
