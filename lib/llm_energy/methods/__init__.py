"""The methods the phases apply (middle layer): log-likelihood scoring (:mod:`.scoring`), fixed-length
generation (:mod:`.generation`), magnitude and Wanda pruning (:mod:`.sparsify`), LoRA/QLoRA training
(:mod:`.lora_training`)."""
