# The input and params functions and paths of rules/features.smk, included by it before its rules.
def feature_inputs(wildcards):
    """The decoded images (their content keys the store), the previous cached layer, the init's weights."""
    previous = runs.previous_stage(FEATURE_CHAINS, wildcards.backbone, wildcards.layer)
    inputs = subset_files()
    if previous is not None:
        inputs["previous"] = feature_files(wildcards.backbone, wildcards.init, previous)
    weights = settings.weights_of(FEATURE_INITS[wildcards.init], wildcards.backbone)
    return inputs | ({"weights": weights_file(*weights)} if weights else {})


def feature_args(wildcards, input):
    previous = runs.previous_stage(FEATURE_CHAINS, wildcards.backbone, wildcards.layer)
    args = f"--init {FEATURE_INITS[wildcards.init]} --data {os.path.dirname(input.subset)} --store {LAYER_STORE}"
    if previous is None:
        args += f" --inputs {os.path.dirname(input.subset)}"
    else:
        folder = os.path.dirname(input.previous[0])
        args += f" --from-layer {previous} --inputs {folder}"
    if "weights" in input.keys():
        args += f" --weights {input.weights}"
    return args
