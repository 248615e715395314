from r3v.cli import main

main()
