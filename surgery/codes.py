"""Every diagnostic code, with the one thing it means.

A code names one fact about a recipe or a run, so a user can look it up and a test can assert
it; two unrelated errors never share a code. The first two digits say which stage finds it:

=========  ====================================================================================
``S00xx``  the command line and the recipe file, before parsing
``S01xx``  syntax: the recipe does not parse
``S02xx``  check: names, value ranges and contradictions, without a model
``S03xx``  resolution against a model: loading it, its inputs, the output directory, and each
           pass's planning (a decade per pass: ``S031x`` group, ``S032x`` skip, ``S033x``
           drop, ``S034x`` truncate, ``S036x`` split); ``S035x`` writing the output
``S04xx``  apply: a statement failed on the model, or left it broken
``S05xx``  contracts: an ``expect`` that the result does not meet
=========  ====================================================================================

A code that falls out of use is retired, never given a new meaning (``S0202`` was never used).
``tests/test_codes.py`` keeps the table true to the source: every code raised is listed here,
every code listed is raised, and each is raised by one module unless the test lists the
modules that share it and why.

>>> CODES["S0203"]
'an invalid value: out of range, empty, of the wrong kind, or repeated'
>>> sorted({code[:3] for code in CODES})
['S00', 'S01', 'S02', 'S03', 'S04', 'S05']
"""

from __future__ import annotations

__all__ = ["CODES"]

CODES: dict[str, str] = {
    # --- S00xx: the command line and the recipe file ------------------------------------------
    "S0001": "the recipe file cannot be read (missing, a directory, or not UTF-8)",
    "S0002": "a `--target` option is not of the form `BACKEND[:DEVICE]`",
    "S0003": "a `--metric` option cannot be imported",
    "S0004": "`--parallel` outside a torchrun launch, or the process group cannot be joined",
    # --- S01xx: syntax (surgery.parse) --------------------------------------------------------
    "S0101": "unknown statement",
    "S0102": "unknown word in a statement (a misspelt keyword or option)",
    "S0103": "unexpected character or word where the statement cannot continue",
    "S0104": "incomplete statement",
    "S0105": "malformed number: not a number, not a whole number, too large or too small",
    "S0106": "an option is given twice in one statement",
    "S0107": "unterminated or misplaced string",
    "S0108": "a selector nested too deeply",
    "S0109": "missing space between two words",
    # --- S02xx: check, without a model (surgery.check) ----------------------------------------
    "S0201": "unknown name where the language lists the valid ones (type, method, backend)",
    "S0203": "an invalid value: out of range, empty, of the wrong kind, or repeated",
    "S0204": "options that contradict each other or do not go together, or one missing",
    "S0205": "a second `calibrate` statement",
    "S0206": "`freeze` or `regularize` without a later `heal`",
    "S0207": "`expect speedup on B` without a `target B`",
    "S0208": "a contract that can never hold",
    "S0209": "a statement, option or value this build does not implement yet",
    # --- S030x: the manager, against a model (surgery.manager) --------------------------------
    "S0301": "a selector matched no module of the model (an error with `--strict`)",
    "S0302": "the model could only be analysed in part (e.g. it could not be traced)",
    "S0303": "`heal steps` capped by `--max-heal-steps`",
    "S0304": "drift measured on the calibration rows data-aware steps were fitted to",
    # --- S031x: loading the model (surgery.cli); `group` --------------------------------------
    "S0310": "the model cannot be loaded",
    "S0311": "a saved surgery output cannot be loaded (`surgery load`)",
    "S0312": "`group q` on an attention that supports only `kv` grouping",
    "S0313": "`group` found no supported self-attention in the model",
    "S0314": "`group` head count does not divide the attention's current heads",
    # --- S032x: the model's inputs (surgery.cli); `skip tokens` -------------------------------
    "S0320": "the model's example or calibration inputs cannot be made or read",
    "S0321": "`skip tokens` block index out of range for the model",
    "S0323": "`skip tokens` on a model that already skips tokens",
    "S0324": "`skip tokens` on a model without a CLS token",
    # --- S033x: the output directory (surgery.cli); `drop` ------------------------------------
    "S0330": "the output directory exists (without `--force`) or cannot be replaced",
    "S0331": "`drop` of a sublayer other than `attention` or `mlp`",
    "S0333": "`drop` count out of range for the model",
    # --- S034x: `truncate` --------------------------------------------------------------------
    "S0340": "`truncate` found no repeated transformer blocks",
    "S0341": "`truncate keep` count out of range for the model",
    "S0342": "`truncate` block index out of range for the model",
    "S0343": "`truncate` does not know which config key counts the blocks (the output would "
    "not load)",
    # --- S035x: the operating system refused a file operation (surgery.cli) -------------------
    "S0350": "the output cannot be written (disk full, read-only, no permission)",
    "S0351": "the system refused a file operation",
    # --- S036x: `split` (warnings: the layer is left as it is) --------------------------------
    "S0360": "`split` skips a Conv3d whose padding cannot be made explicit",
    "S0361": "`split (2+1)d` skips a grouped Conv3d",
    # --- S037x: healing data and checkpoints (surgery.manager) --------------------------------
    "S0370": "`heal` training or held-out data cannot be read, is empty, lacks the named field "
    "or labels, or does not suit the model",
    "S0371": "`--resume` found a checkpoint of another recipe or model, or an unreadable one",
    # --- S038x: streamed surgery (surgery.stream) ----------------------------------------------
    "S0380": "`apply --stream` refuses a statement that needs the whole model (data-aware, "
    "non-local or training)",
    "S0381": "the model cannot be streamed (not a safetensors Hugging Face directory, weights "
    "named otherwise, or it does not run on the meta device)",
    "S0382": "a streamed run measured no drift or speed",
    # --- S04xx: apply (surgery.manager, surgery.passes) ---------------------------------------
    "S0401": "a statement cannot be carried out on this model; the model is left unchanged",
    "S0402": "after a statement the model no longer runs",
    "S0403": "a statement changed the model's output shapes",
    "S0404": "after a statement the model outputs NaN or infinity",
    "S0410": "a module the plan chose is no longer what it was (an earlier statement changed it)",
    # --- S05xx: contracts (surgery.cli; `rank = auto` in surgery.passes.decompose) ----------
    "S0501": "a contract (`expect`) is not met",
    "S0502": "no choice of ranks (`rank = auto`, `budget latency`) can meet a contract or the "
    "budget",
}
