"""The `dsmoe` command: everything after training, one subcommand each (training is
`deepspeed launchers/train.py`). Each module has `main(argv, prog)`; `dsmoe.cli` dispatches to it."""
