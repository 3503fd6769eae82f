"""Kernels of our own, each beside the pure-PyTorch reference it is tested against (kept under launcher/: a top-level
package named `kernels` would shadow Hugging Face's, which transformers probes)."""
