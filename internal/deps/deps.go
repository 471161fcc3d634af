// Package deps pins the project's dependencies while the packages that use them are written.
package deps

import (
	_ "github.com/hashicorp/consul/api"
	_ "github.com/nacos-group/nacos-sdk-go/v2/clients"
	_ "go.etcd.io/etcd/client/v3"
	_ "go.etcd.io/etcd/server/v3/embed"
	_ "go.uber.org/goleak"
	_ "google.golang.org/grpc"
	_ "k8s.io/client-go/kubernetes"
	_ "sigs.k8s.io/controller-runtime/pkg/envtest"
)
