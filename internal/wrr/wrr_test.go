package wrr

import (
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"
)

func TestScheduleFollowsWeights(t *testing.T) {
	for _, tc := range []struct {
		name    string
		weights []int
	}{
		{"equal", []int{1, 1, 1}},
		{"one to three", []int{1, 3}},
		{"mixed", []int{5, 1, 10, 2, 7}},
		{"below one counts as one", []int{0, -3, 2}},
		{"single", []int{4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := New(tc.weights)
			sum := 0
			for _, w := range tc.weights {
				sum += max(w, 1)
			}
			var seq atomic.Uint64
			const rounds = 10000
			counts := make([]int, len(tc.weights))
			for range rounds * sum {
				counts[s.Next(&seq)]++
			}
			for i, w := range tc.weights {
				want := rounds * max(w, 1)
				if d := counts[i] - want; d > want/100 || -d > want/100 {
					t.Errorf("endpoint %d (weight %d): %d picks, want %d ±1%%: %v", i, w, counts[i], want, counts)
				}
			}
		})
	}
}

func TestScheduleIsSmooth(t *testing.T) {
	// Weights 1:3: endpoint 0 never gets two picks in a row, and endpoint 1
	// never goes more than 3 picks without one.
	s := New([]int{1, 3})
	var seq atomic.Uint64
	prev, run := -1, 0
	for i := range 4000 {
		got := s.Next(&seq)
		if got == prev {
			run++
		} else {
			run = 1
		}
		prev = got
		if got == 0 && run > 1 || got == 1 && run > 3 {
			t.Fatalf("pick %d: endpoint %d picked %d times in a row", i, got, run)
		}
	}
}

func BenchmarkNext(b *testing.B) {
	ws := make([]int, 1000)
	for i := range ws {
		ws[i] = 1 + i%10
	}
	s := New(ws)
	var seq atomic.Uint64
	b.ReportAllocs()
	for b.Loop() {
		s.Next(&seq)
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
