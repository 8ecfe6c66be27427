"""Retrieval-augmented generation core: parsing, chunking, embedding, indexing, fusion, reranking.

Pure Python with no Django imports, so every piece can be tested without a database. Heavy
libraries (torch, sentence-transformers, FAISS) are imported lazily inside the functions that need
them; importing this package is cheap.
"""
