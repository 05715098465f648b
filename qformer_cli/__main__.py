from qformer_cli.cli import main

main()
