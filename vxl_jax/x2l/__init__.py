"""Video-X2L: bi-level KV compression and selective KV re-loading, training-free on a Video-XL model.

    bilevel.py   one scan, two compression levels (L-KV low ratio, H-KV high ratio) of the same windows
    merge.py     per question: the selected chunks' L entries and the others' H entries, in order, re-numbered
    oracles.py   chunk relevance (LLM attention, CLIP retrieval, uniform / last / random baselines), top-k
    runner.py    encode once, answer many questions; X2LConfig and its `k=v` parser
"""
