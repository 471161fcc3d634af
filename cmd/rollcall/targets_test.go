package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// TestGRPCTargetFormsOpen checks, for every backend linked into the
// command, that the gRPC target forms grpcresolver documents split into a
// registry URL that the backend accepts (Open does not dial).
func TestGRPCTargetFormsOpen(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: ns}}]
current-context: x
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ target, reg, service string }{
		{"mem://targets/user.rpc", "mem://targets", "user.rpc"},
		{"etcd://127.0.0.1:2379/user.rpc", "etcd://127.0.0.1:2379", "user.rpc"},
		{"etcd://h1:2379,h2:2379/team-a/user.rpc?ttl=5s", "etcd://h1:2379,h2:2379/team-a?ttl=5s", "user.rpc"},
		{"rollcall+etcd://127.0.0.1:2379/user.rpc?layout=gozero", "etcd://127.0.0.1:2379?layout=gozero", "user.rpc"},
		{"rollcall+etcd://127.0.0.1:2379/helloworld?layout=kratos", "etcd://127.0.0.1:2379?layout=kratos", "helloworld"},
		{"consul://127.0.0.1:8500/user.rpc?ttl=5s", "consul://127.0.0.1:8500?ttl=5s", "user.rpc"},
		{"consul:///user.rpc", "consul:///", "user.rpc"},
		{"nacos://127.0.0.1:8848/user.rpc?namespace=dev", "nacos://127.0.0.1:8848?namespace=dev", "user.rpc"},
		{"k8s://default/user:8080?kubeconfig=" + kubeconfig, "k8s://default?kubeconfig=" + kubeconfig, "user:8080"},
		{"k8s:///user:8080?kubeconfig=" + kubeconfig, "k8s:///?kubeconfig=" + kubeconfig, "user:8080"},
	} {
		reg, service, err := grpcresolver.SplitTarget(tc.target)
		if err != nil || reg != tc.reg || service != tc.service {
			t.Errorf("SplitTarget(%q) = %q, %q, %v; want %q, %q", tc.target, reg, service, err, tc.reg, tc.service)
			continue
		}
		r, err := registry.Open(context.Background(), reg)
		if err != nil {
			t.Errorf("target %q: registry.Open(%q): %v", tc.target, reg, err)
			continue
		}
		r.Close()
	}
}
