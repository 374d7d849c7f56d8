"""Outside implementations of the expert stage, adapted to the contract's signature (docs/contract.md,
"Entry points") so that `--impl` can check them: Hugging Face transformers' experts classes (hf.py) and two JAX
implementations (jax_moe.py). Each needs its optional extra: `pip install -e ".[hf]"`, `".[jax]"`."""
