"""Training of the DualToken models: the toy-world teacher and the stage-1 tokenizer (paper Sec. 3.2, Table 3).

Entry points: ``python -m training.train_teacher`` and ``python -m training.train_tokenizer`` (see README.md here);
``training.common`` holds the resumable, accelerate-based run machinery, ``training.losses`` the stage-1 losses.
"""
