module github.com/runservice/runservice/examples/producer-go

go 1.22
