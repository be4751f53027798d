"""Benchmarks: bench.py (minillava train_step), hf_baseline.py (plain transformers), cuda_check.py and
gpu_session.sh (the whole GPU check in one command). Run from anywhere: python bench/bench.py ..."""
