package main

// Every backend rollcall ships, so that every URL scheme works.
import (
	_ "github.com/rollcall-go/rollcall/backends/consul"
	_ "github.com/rollcall-go/rollcall/backends/etcd"
	_ "github.com/rollcall-go/rollcall/backends/k8s"
	_ "github.com/rollcall-go/rollcall/backends/memory"
	_ "github.com/rollcall-go/rollcall/backends/nacos"
	_ "github.com/rollcall-go/rollcall/backends/static"
)
