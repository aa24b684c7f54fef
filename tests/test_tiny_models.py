from dresd.models import load_model, model_fingerprint


def test_tiny_models_load_from_disk_and_fingerprint_differs(tiny_model_dirs):
    prints = set()
    for path in tiny_model_dirs.values():
        model, tok = load_model(path, device="cpu")
        assert model.config.vocab_size == len(tok)
        ids = tok.apply_chat_template([{"role": "user", "content": "def f(x):"}],
                                      add_generation_prompt=True, return_dict=False)
        assert len(ids) > 3
        prints.add(model_fingerprint(model, tok))
    assert len(prints) == 3
