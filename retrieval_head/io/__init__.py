"""A head folder on disk and on the Hub: the folder format and atomic writes (`folder`), save, load, Hub, model
card, transformers' Auto classes, the sentence-transformers modules, the embedded default models, and the
content-keyed tensor cache."""
