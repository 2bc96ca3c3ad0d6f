"""The ``smplora demo``: a tiny latent diffusion model on scikit-learn's digits, LoRA with and without
SMP-LoRA, audited with the whole attack suite (see docs/demo.md).

``--dataset textures`` swaps in a harder, generated data set (:mod:`.textures`; :mod:`.datasets`
names both). Modules: :mod:`.data` (identity splits), :mod:`.model` (``TinyLDM``: diffusers UNet + peft LoRA),
:mod:`.train` (plain loops), :mod:`.quality` (digit classifier, sampling, Fréchet distance),
:mod:`.target` (the AuditTarget adapter), :mod:`.pipeline` (``run_demo``), :mod:`.cli`,
:mod:`.make_assets` (writes the shipped weights in ``assets/``). diffusers, peft and scikit-learn
are imported only when used.
"""
