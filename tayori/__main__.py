from tayori.cli import main

main()
