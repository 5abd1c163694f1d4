"""Every CLI command module; importing this package registers them on ``kvfree.cli.app``."""

from kvfree.commands import (  # noqa: F401
    bench_capacity,
    bench_decode,
    bench_fdm_mqar,
    bench_frontier,
    bench_kernels,
    bench_prefill_speed,
    bench_recall,
    bench_ridge_study,
    bench_train_speed,
    data,
    demo,
    eval,
    export_hf,
    generate,
    info,
    report_all,
    report_lm,
    reproduce,
    train,
)
