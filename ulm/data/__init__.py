"""Datasets: sources and named corpora, cleaning, tokenizers, flat token files with a manifest."""
from ulm.data.build import build_dataset
from ulm.data.dataset import dataset_id, load_manifest, load_split, load_tokenizer, verify_dataset

__all__ = ["build_dataset", "dataset_id", "load_manifest", "load_split", "load_tokenizer", "verify_dataset"]
