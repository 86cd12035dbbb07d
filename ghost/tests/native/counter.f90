! A Fortran program checkpointed through krun's native C ABI (ghost/include/krun_ghost.f90).
! usage: counter STEPS CKPT_STEP; prints "step N sum S" per step.
program counter
  use iso_c_binding
  use krun_ghost
  implicit none
  integer, parameter :: n = 1048576
  type(c_ptr) :: ps, px
  integer(c_long), pointer :: state(:)
  real(c_double), pointer :: x(:)
  integer(c_long) :: restored, v
  integer(c_int) :: rc1, rc2
  integer :: steps, ckpt
  character(len=32) :: arg

  call get_command_argument(1, arg)
  read (arg, *) steps
  call get_command_argument(2, arg)
  read (arg, *) ckpt
  restored = krun_ghost_init("fortran"//c_null_char)
  if (restored < 0) stop 2
  ps = krun_ghost_alloc(int(4096, c_size_t))
  px = krun_ghost_alloc(int(n, c_size_t) * 8_c_size_t)
  call c_f_pointer(ps, state, [2])
  call c_f_pointer(px, x, [n])
  rc1 = krun_ghost_register("state"//c_null_char, ps, int(4096, c_size_t))
  rc2 = krun_ghost_register("x"//c_null_char, px, int(n, c_size_t) * 8_c_size_t)
  if (rc1 < 0 .or. rc2 < 0) stop 3
  if (restored > 0) then
    print '(a,i0,a,i0)', 'resumed version ', restored, ' step ', state(1)
  else
    state(1) = 0
    x = 1.0d0
  end if
  do while (state(1) < steps)
    state(1) = state(1) + 1
    x = x * 1.0000001d0 + dble(state(1))
    print '(a,i0,a,es24.16)', 'step ', state(1), ' sum ', sum(x)
    if (state(1) == ckpt) then
      v = krun_ghost_checkpoint()
      if (v < 0) stop 4
      v = krun_ghost_wait()
      if (v < 0) stop 5
    end if
  end do
end program counter
