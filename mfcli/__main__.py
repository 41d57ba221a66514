from mfcli.cli import main

main()
