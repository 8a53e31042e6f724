"""What the tests and the bench scripts share: small models built from config (:mod:`.models`),
offline stand-ins for the paper-scale models and their tokenizers (:mod:`.paper_models`), the
Hugging Face cache layout the hub fixtures are written in (:mod:`.hub_cache`) and llm-compressor's
GPTQ and AWQ as the reference they are cross-checked against (:mod:`.reference_quantizers`)."""
