"""Retrieval: datasets of queries and documents (`data`), the teacher's fingerprint and cached embeddings
(`fingerprint`, `teacher`), and the faiss document index that refuses another teacher's queries (`index`)."""
