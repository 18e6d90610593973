"""Text sources and calibration data."""
from __future__ import annotations


def calibration_ids(cal, model, tokenizer, data_dir=None):
    """Calibration token ids ``[samples, seqlen]`` for a recipe's ``calibration`` section.

    ``dataset: selfgen`` generates them with the model itself (Norm Tweaking's data, cached on disk);
    otherwise random segments of a text set (C4 validation by default).
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and cal.seqlen > max_pos:
        from normquant.data.text import DataError

        raise DataError(f"calibration seqlen {cal.seqlen} exceeds the model's max_position_embeddings {max_pos}; "
                        f"set calibration.seqlen to {max_pos} or less")
    if cal.dataset == "selfgen":
        from normquant.data.selfgen import generate_calibration
        from normquant.models.streaming import check_materialized

        check_materialized(model)  # a streamed model cannot generate before its blocks are read

        return generate_calibration(model, tokenizer, n=cal.samples, seqlen=cal.seqlen, seed=cal.seed)
    from normquant.data.text import calibration_samples

    return calibration_samples(tokenizer, cal.dataset, cal.split, n=cal.samples, seqlen=cal.seqlen, seed=cal.seed,
                               data_dir=data_dir)
