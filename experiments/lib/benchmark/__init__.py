"""The speed benchmark behind :mod:`experiments.benchmark`: a timing and memory harness (:mod:`.harness`), one
module per section (:mod:`.peak`, :mod:`.counting`, :mod:`.throughput`, :mod:`.side_by_side` for forward and
train, :mod:`.loss`, :mod:`.forecast`), the transformers (+PEFT) side (:mod:`.hf`), the options (:mod:`.options`)
and the targets and README table (:mod:`.report`)."""
