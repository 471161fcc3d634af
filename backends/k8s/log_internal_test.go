package k8s

import (
	"log/slog"
	"strings"
	"testing"

	"time"

	"k8s.io/klog/v2"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
)

// testKlogIsRoutedOnlyWhenAsked (issue 11 item 4): a Registry leaves the
// process's klog setup alone unless asked (RouteClientGoLogs); asked,
// client-go's lines reach its Logger.
func testKlogIsRoutedOnlyWhenAsked(t *testing.T, env *kubeEnv) {
	var app, ours testutil.Buffer
	klog.SetSlogLogger(slog.New(slog.NewTextHandler(&app, nil))) // the application's own klog setup
	defer klog.ClearLogger()
	ns := env.namespace(t)
	r, err := NewForConfig(env.config(testserver.KubeAdmin), &Options{Namespace: ns, Logger: slog.New(slog.NewTextHandler(&ours, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Lookup(ctxFor(t, 10*time.Second), "web"); err != nil {
		t.Fatal(err)
	}
	klog.Info("line-one")
	klog.Flush()
	if !strings.Contains(app.String(), "line-one") || strings.Contains(ours.String(), "line-one") {
		t.Fatalf("without RouteClientGoLogs klog went elsewhere than the application set: app=%q registry=%q", app.String(), ours.String())
	}
	r2, err := NewForConfig(env.config(testserver.KubeAdmin), &Options{Namespace: ns, Logger: slog.New(slog.NewTextHandler(&ours, nil)), RouteClientGoLogs: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	klog.Info("line-two")
	klog.Flush()
	if !strings.Contains(ours.String(), "line-two") {
		t.Fatalf("with RouteClientGoLogs klog did not reach the Registry's Logger: %q", ours.String())
	}
}
