"""Files and formats: how every byte RELEX reads or writes gets to and from disk.

Owns the atomic writers and the "outputs are free" check (:mod:`.fs`), the Hugging Face checkpoint readers and
safetensors writing (:mod:`.checkpoints`), the state file (:mod:`.state`), the field checks of files read back
(:mod:`.schema`), ``report.json`` (:mod:`.report`) and the output forms behind one writer interface
(:mod:`.writers`: full model, PEFT adapter, sharded across processes), and safetensors streamed a tensor at a time
(:mod:`.streaming`: slices read into float32 memory, state parts joined, shards written tensor by tensor).
May import: the ground floor and :mod:`relex_callback.core`. Never the trajectory store, the pipeline, trainers or
the command line.
"""
