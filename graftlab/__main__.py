from graftlab.cli.app import main

main()
