from flowagg.cli.main import main

main()
